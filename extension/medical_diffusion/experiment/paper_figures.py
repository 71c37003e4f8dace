"""The paper's own numbers (de Wilde et al., MIDL 2024), shown next to ours in the tables."""

from __future__ import annotations

#: Table 1: parameter -> value -> (FID, MFID); every parameter varied around 100 steps, CFG 2, 64 vectors, 100 cases
TABLE1 = {
    "steps": {25: (118, 4.04), 50: (106, 3.38), 75: (101, 3.11), 100: (99, 2.87)},
    "cfg": {1: (85, 4.50), 2: (99, 2.87), 3: (146, 4.51), 5: (173, 61.4)},
    "n_vectors": {8: (100, 2.92), 16: (110, 3.22), 32: (149, 2.86), 64: (99, 2.87)},
    "cases": {5: (158, 2.55), 10: (106, 3.25), 50: (96, 3.41), 100: (99, 2.87)},
}
#: Appendix A: MFID of the final configuration with its 95% bootstrap CI
APPENDIX_A_MFID_CI = (2.87, 1.34, 5.32)
#: Table 2: column -> paper row (1-7) -> (mean AUC, sd) over 10 runs; rows 6-7 use 10-case embeddings (*)
TABLE2_ROWS = {1: (200, "0"), 2: (200, "2000"), 3: (0, "200"), 4: (0, "2000"), 5: (200, "200"), 6: (0, "2000*"),
               7: (200, "2000*")}
TABLE2 = {
    "prostate": {1: (0.780, 0.017), 2: (0.803, 0.009), 3: (0.737, 0.019), 4: (0.766, 0.020), 5: (0.773, 0.015),
                 6: (0.562, 0.036), 7: (0.745, 0.012)},
    "cardiomegaly": {1: (0.732, 0.021), 2: (0.737, 0.019)},
    "histopathology": {1: (0.878, 0.011), 2: (0.862, 0.017)},
}
PARAMETER_LABELS = {"steps": "sampling steps", "cfg": "CFG scale", "n_vectors": "embedding size (vectors)",
                    "cases": "training cases"}
