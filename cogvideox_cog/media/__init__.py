"""Pictures and video in and out: the i2v image, the v2v clip, their URLs, and the mp4."""
