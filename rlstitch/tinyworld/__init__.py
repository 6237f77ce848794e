"""TinyWorld: a procedural 32x32 image+caption world for training and testing the tiny pretrained models."""
