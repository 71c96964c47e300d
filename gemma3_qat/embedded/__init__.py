"""Builders of the shipped default model and of test fixtures (corpus, samples, tokenizer, tiny models,
pretraining). Not needed at run time by users: ``gemma3_qat.assets`` holds the built data."""
