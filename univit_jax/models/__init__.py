"""The UniViT encoder: ViT backbone, U-RoPE and the attention-pooling head."""
