"""Models: recurrent cells, stacks and the networks built on them."""
