"""README's and docs/'s generated tables, written from the recorded results under docs/results/."""
