"""pixel-server: the aiohttp application that answers tracking pixels and flushes their counts."""
