"""3D geometry: depth back-projection, per-patch points, geometry encoders and geometry sources."""
