"""Model bundles: the JSON model card, safetensors weights, building the network a
card describes, and the checks that an input fits what a model was made for.
"""
