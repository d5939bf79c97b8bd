"""A tiny calculator with a bug for the Deputies demo."""


def add(a, b):
    return a - b


def multiply(a, b):
    return a * b
