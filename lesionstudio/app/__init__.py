"""The app: the Studio's tasks as library calls, the sampler worker, the Gradio interface, the
reader study, the Space.
"""
