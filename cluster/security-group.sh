#!/usr/bin/env bash
# The cluster's security group, made once: SSH from one network you name, the nodes to each other, nothing
# else. Put the id it prints in cluster.yaml (SecurityGroupIds of both node types).
#   SSH_CIDR=198.51.100.7/32 bash cluster/security-group.sh [VPC_ID]
set -euo pipefail
: "${SSH_CIDR:?set SSH_CIDR to the one network allowed to reach port 22, e.g. your VPN's 198.51.100.7/32}"
case "$SSH_CIDR" in 0.0.0.0/*|::/*) echo "SSH_CIDR=$SSH_CIDR opens SSH to everyone; name your own network" >&2; exit 2;; esac
REGION="${AWS_REGION:-us-west-2}"
VPC="${1:-$(aws ec2 describe-vpcs --region "$REGION" --filters Name=isDefault,Values=true --query 'Vpcs[0].VpcId' --output text)}"
SG=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC" --group-name raycache-sg \
      --description "raycache: SSH from $SSH_CIDR, nodes to each other" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
    --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$SSH_CIDR}]" > /dev/null
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
    --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG}]" > /dev/null
echo "$SG"
