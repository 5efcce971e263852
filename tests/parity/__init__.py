"""Parity with the reference implementations (diffusers, transformers, peft) on tiny random models.

How the tolerances are set. Both sides compute in float32 (unit roundoff u = 2**-24 ~ 6e-8), with
different kernels: PyTorch's vectorised CPU kernels (their rounding depends on the CPU family and the
thread count) against XLA's. A tolerance therefore bounds float32 rounding of the computation, never a
value one machine printed:

* Elementwise schedule arithmetic and closed forms: bit equality where both sides run the same IEEE
  operations in the same order (the linear / scaled-linear / cosine betas), otherwise a first-order
  error bound written out beside the test (``tests/test_schedules.py``: the zero-terminal-SNR
  rescaling, whose shift ``s_j - s_L`` is ill-conditioned near the end).
* Sampler trajectories (``<= 1e-5`` max relative difference): 1-50 steps of a toy model, each step a
  few tens of float32 operations whose coefficients are O(1) away from the last steps; accumulated
  rounding stays near ``steps * tens * u`` ~ 1e-6 to 1e-5 of the state's scale. Each sampler file was
  checked to pass with its tolerances cut to 0.3x, with PyTorch on 1 and on 2 threads
  (``JDIFF_TORCH_THREADS=N``, read by ``tests/conftest.py``), so a factor of three separates the
  bound from what these machines produce.
* The 1000-step DDPM chain: each side against a float64 recomputation with a propagated first-order
  bound (``tests/parity/test_ddim_ddpm.py::ddpm_chain_reference``), since 1000 steps of float32
  rounding (~2e-5) is as large as the difference between two float32 implementations.
* Networks (UNet, VAE, text encoder, ControlNet: ``1e-5``-``1e-4`` relative): a forward pass is ~20-60
  layers of dot products of length K <= 1,200 on these tiny configs; summation error grows like
  ``sqrt(K) u`` per layer (pairwise / blocked accumulation on both sides), ~2e-6 per layer at the
  widest, compounding to the stated bounds through normalisation layers that keep activations O(1).
  The same 0.3x check passed for these files.

Reference order-sensitivity: PyTorch splits reductions (softmax, group norm, matmul) over threads, so a
reference may move by a few ulps between thread counts; no tolerance here relies on a single count.
"""
