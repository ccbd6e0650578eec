"""Studies on Ray Tune with MLflow (the `[studies]` extra): everything that imports Ray or MLflow lives here.

A study script (studies/*.py) imports `runner`, which gathers what it needs of the other modules."""
