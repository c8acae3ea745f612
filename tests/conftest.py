# Put the repo root on sys.path so the tests can `import humelib` and the scripts under a bare `pytest`
# too (`python -m pytest` adds the working directory itself; plain `pytest` only adds tests/).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
