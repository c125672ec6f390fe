"""The Hopfield VAE family (Van Der Meersch, Deleu, Demeester 2023) and its feedforward baseline.

- `latent`: the probabilistic pieces shared by every variant (latent code maps, likelihoods, KL);
- `fvae`: F-VAE, feedforward encoder and decoder trained by backprop (the baseline);
- `hopfield`: H-VAE, DH-VAE, TDH-VAE and the shared layered VAE, trained by EP on a Device;
- `metrics`: test negative ELBO, reconstruction error, Frechet distance in the feature space
  of a fixed digits classifier;
- `train`: the training loop behind `hil train vae`.
"""
