"""Serving HINT: the cached predictor, batch prediction on Ray Data, the Ray Serve app."""
