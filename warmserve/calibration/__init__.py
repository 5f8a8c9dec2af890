"""`warmserve calibrate`: measure a device profile with the real worker and engine.

`fit` (numpy only) fits the simulator's step-time model to measured step times; `measure`
(torch) runs the measurements; `report` writes the profile, the report and the fit plot.
"""
