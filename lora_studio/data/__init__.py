"""Training data: reading and checking images, captions (metadata.csv and .txt), buckets, latent cache."""
