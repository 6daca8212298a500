"""What the converters, the MindSpore runtime and the validation share: the ChatGLM2 config, the weight-name
schema, element types, JSON read with limits, the error types, the bundled tokenizer, and the CLI vocabulary."""
