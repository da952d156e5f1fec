"""Low-bit weights: GGUF blocks dequantised in torch (`gguf_blocks`), GGUF files as component weights
(`gguf_file`), and the Linear layer that keeps its weight quantised until it is used (`layers`)."""
