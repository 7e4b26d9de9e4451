"""Recipes that compose the engine end to end: the embedded build (and its tokenizer training), the
study driver, the training-step benchmark."""
