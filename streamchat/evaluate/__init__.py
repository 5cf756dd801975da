"""Measuring tools: perplexity (`ppl`), decode speed (`speed`, `bench`), memory (`stress`, `soak`). They drive the
engine like a front end does and never reach into it from below."""
