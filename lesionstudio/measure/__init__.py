"""What is measured: PSNR/SSIM, features, bits per code, the two-sample test, nearest images,
lesion shape.
"""
