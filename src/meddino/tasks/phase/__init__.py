"""Surgical phase recognition: frame classifier + causal MS-TCN (seed 000's protocol), online inference."""
