"""A small MLP regressor for tabular rows (scikit-learn's diabetes set). Shipped in the archive."""
from torch import nn


class SimpleModel(nn.Module):
    """Standardized features in, one standardized target value out."""

    def __init__(self, in_features: int = 10, hidden: int = 5):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.layers(x)
