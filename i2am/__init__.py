"""i2am: I2AM attribution maps for image-to-image diffusion models, computed inside attention."""
