"""Teachers: frozen models that map images or captions to features."""
