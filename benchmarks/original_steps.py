"""Steps/s of the original CompressionVAE (TensorFlow), run beside ``train_throughput``.

This script runs under a *different* Python: one with TensorFlow 2.x and the original's own
dependencies (joblib, tqdm, matplotlib), given a checkout of https://github.com/maxfrenzel/CompressionVAE.
It imports neither torch nor this project. ``benchmarks.train_throughput --original-python PY
--original-repo DIR`` starts it once per latent size and alternates it with its own set-ups.

It builds the original's own ``CompressionVAE(X, dim_latent=k)`` (default architecture: encoder
widths from the original's rule, 5 IAF steps, orthogonal initializer, batch 64) on 512 random
rows of 784 features (of which it trains on its 90% split, 460 rows), and times its training op
``sess.run([loss, optim])`` with dropout off (keep probability 1, as ``train_throughput`` runs)
in two ways:

* ``queue``: the batch dequeued from the original's FIFO queue, filled row by row by its reader
  thread (``DataReader.start_threads``), which is how the original trains;
* ``fed``: a batch of the training rows, normalized as the reader does, fed straight into the
  dequeue's output tensor (``feed_dict``), which leaves the queue and reader out of the step: the
  faster of the two, so the stronger baseline.

Protocol: after warm-up it prints ``ready``; then each line ``MODE N`` on stdin runs N steps in
that mode and prints their seconds; an empty line or end of input ends it. Stdout carries only
the protocol: the original's own prints, and the architecture it built, go to stderr.

    PY benchmarks/original_steps.py REPO K
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time


def main() -> int:
    repo, k = sys.argv[1], int(sys.argv[2])
    sys.path.insert(0, repo)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    with contextlib.redirect_stdout(sys.stderr):  # the original prints as it imports and builds
        import tensorflow.compat.v1 as tf
        from cvae.cvae import CompressionVAE  # the original's package

    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 784)).astype(np.float32)
    with tempfile.TemporaryDirectory() as logdir:  # the reader reads norm.pkl here every epoch
        with contextlib.redirect_stdout(sys.stderr):
            model = CompressionVAE(X, dim_latent=k, logdir=logdir)
        sess, graph = model.sess, model.graph
        with graph.as_default():
            size = sum(int(np.prod(v.shape)) for v in tf.trainable_variables())
            tf.train.start_queue_runners(sess=sess, coord=model.coord)
            model.reader.start_threads(sess)
        p = model.param
        print(f"original: k {k}, cells {p['cells_encoder']}, hidden {p['cells_hidden']}, "
              f"{p['iaf_flow_length']} IAF steps, batch {model.batch_size}, {size:,} parameters, "
              f"tensorflow {tf.__version__}", file=sys.stderr)
        ops = [model.loss, model.optim]
        base = {model.dropout_placeholder: 1.0, model.lr_placeholder: 1e-3}
        rows = (model.X - model.mean) / model.norm  # the training split, as the reader feeds it
        batches = [rows[i:i + 64] for i in range(0, len(rows) - 63, 64)]

        def run(mode: str, n: int) -> float:
            if mode not in ("queue", "fed"):
                raise ValueError(f"unknown mode {mode!r}: queue or fed")
            start = time.perf_counter()
            for i in range(n):
                feed = (base if mode == "queue"
                        else {**base, model.train_batch: batches[i % len(batches)]})
                sess.run(ops, feed_dict=feed)
            return time.perf_counter() - start

        run("queue", 20)
        run("fed", 20)
        print("ready", flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            mode, n = line.split()
            print(f"{run(mode, int(n)):.6f}", flush=True)
        model.coord.request_stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
