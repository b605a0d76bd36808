"""Drawing codes: one grid with a prior, a stack of levels (layouts, ranking, inpainting), the
generation settings, teacher-forced draws, loading stacks.
"""
