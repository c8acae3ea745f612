"""humelib: the code the scripts share (hume.py, run_turtle.py, evaluate.py and the others at the top level).
The Python API for notebooks is humelib.api."""
