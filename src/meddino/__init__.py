"""meddino: continued DINO pretraining and evaluation for medical and surgical images."""

__version__ = "0.1.0"
