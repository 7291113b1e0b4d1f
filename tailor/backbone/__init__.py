"""The frozen language model every LM method answers through: loading (`loading`), the model with batched scoring,
generation and per-row edits (`model`), layer sites and hooks (`layers`, `edits`), per-row LoRA (`lora`), partial
forwards (`partial`), and disk caches of what it computes (`cache`, `textcache`). Nothing is imported here, so that
importing one part does not load torch and transformers for another."""
