"""Offline clustering: the teacher-feature store, spherical k-means and the `cluster` stage.

  store.py    workdir/features/<bank>/: chunked float32 features + (sample, sub-index) ids,
              written atomically and resumably by `BankWriter`, streamed by `BankReader`.
  kmeans/     spherical k-means, one module per concern: `lloyd.spherical_kmeans(source,
              ClusterSpec)` (the loop), `sources` (streamed rows), `assigners` (a bf16-screened
              JAX matmul or a ScaNN tree), `bounds` (Hamerly bounds that skip settled rows),
              `checkpoint` (per-iteration resume state).
  labels.py   `run_cluster_stage(workdir, banks)` for --mode=cluster: centroids, top-k labels,
              stats.json and sizes.png per bank; `cluster_specs(run.cluster)` their k-means
              specs.
  extract.py  `run_extract(run, workdir)` for --mode=extract: teacher features of object
              regions and ordered clip segments into the store.
"""
