"""UniViT in JAX: a cluster-driven self-supervised encoder for images and videos."""
