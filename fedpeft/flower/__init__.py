"""The only package that imports Flower: messages, the strategy adapter, the apps."""
