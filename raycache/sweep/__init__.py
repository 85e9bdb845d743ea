"""Ray Tune sweeps over experiment configs."""
