"""The network: prefix embedding, the deep-fusion transformer and the flow-matching action expert."""
