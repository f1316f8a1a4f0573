"""Input data: sources, video decoding, transforms, VS2 frame-count streams and the pipeline."""
