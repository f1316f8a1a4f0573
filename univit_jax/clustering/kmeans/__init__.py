"""Spherical k-means over a streamed feature bank, one module per concern.

  lloyd.py       the driver: `spherical_kmeans(source, ClusterSpec)`, `KMeansResult`,
                 `KMeansError`, initialisation (k-means++) and the update step with re-seeding.
  sources.py     the rows: the `RowSource` protocol, `ArraySource`, centring, normalised blocks
                 over this process's shard.
  assigners.py   nearest-centroid search: `MatmulAssigner` (bf16- or float32-screened JAX
                 matmul, exact float32 scoring) and `ScannAssigner` (ScaNN brute force or tree).
  bounds.py      Hamerly's bounds on the sphere and the assignment pass that skips settled rows.
  candidates.py  each row's list of nearest centroids, rescored between full searches, and the
                 passes that search in full.
  checkpoint.py  the per-iteration state a killed run resumes from.

Callers import the module they need (`from univit_jax.clustering.kmeans import lloyd`);
cross-process sums and barriers are `univit_jax.collectives`.
"""
