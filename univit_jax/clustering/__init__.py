"""Offline clustering: the teacher-feature store, spherical k-means and the `cluster` stage."""
