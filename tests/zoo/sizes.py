"""The zoo's sizes: 12 heads split over 2, 3 and 4 ranks."""

DIM, HEADS, VOCAB = 96, 12, 160
HEAD_DIM = DIM // HEADS
