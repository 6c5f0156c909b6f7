"""The run's settings: ``TrainingConfig`` (a tree of sections) and the command line that fills
it."""
