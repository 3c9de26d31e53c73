"""The bottom layer: errors users see, project paths, atomic directories, the learning-rate schedule, peak
memory, and the helpers the study scripts share. Imports nothing of the package, so every other layer may import it."""
