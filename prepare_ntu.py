"""Convert the NTU RGB+D skeletons into the HDF5 file that `task=ntu_cs` (and ntu_cv, ntu120_*) read.

    python prepare_ntu.py raw=nturgbd_skeletons_s001_to_s017.zip out=data/ntu/ntu60.h5
    python prepare_ntu.py raw=PATH/nturgb+d_skeletons exclude=NTU_RGBD_samples_with_missing_skeletons.txt
    python prepare_ntu.py --help

The logic is in datamodules/ntu_convert.py (HDF5 layout) and datamodules/ntu_skeleton.py (parsing, body selection); see README.md.
"""
import sys

from datamodules.ntu_convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
