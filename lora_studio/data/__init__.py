"""Training data: reading and checking images, captions (metadata.csv and .txt), buckets, latent cache."""

# Defaults of the dataset tools (here, so the command line can name them without importing PIL and numpy).
DEFAULT_MIN_SIZE = 256          # skip images whose short side is under this (px)
DEFAULT_MAX_ASPECT = 4.0        # skip images longer than this ratio
PREPARE_MODES = ("center_crop", "keep_aspect", "copy")
CAPTION_FORMATS = ("txt", "csv", "both", "none")
