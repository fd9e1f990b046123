"""ImageNet-style TFRecord tools: folder converter and bundled sample."""
