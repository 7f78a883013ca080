"""The controller: a detached actor that moves the cluster's layout at run time (role
flips and the disaggregation threshold in the routing table, replica counts through
Serve's external scaler), from the load reports and the routers' demand."""
