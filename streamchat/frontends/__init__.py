"""Front ends: the terminal REPL (`repl`), the browser chat (`web`, its per-tab state `web_state` and registry
`web_sessions`) and the screenshot tool. They hold no model logic: everything goes through `streamchat.session`."""
