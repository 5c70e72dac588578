"""One process, one model: loading, hook sites, capture, intervention, generation and the store. No Ray here."""
