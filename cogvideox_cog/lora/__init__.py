"""LoRA fine-tunes by URL: fetched and checked (fetch), cached (store), read (file), loaded
onto the transformer one at a time (slot)."""
