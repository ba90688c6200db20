"""cvlab: a command-line experiment runner for the computer-vision methods of the curriculum."""

__version__ = "0.1.0"
