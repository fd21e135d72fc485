"""The slice of the `backup-gateway` service model this control plane serves, as plain data.

Why a copy instead of loading botocore: the server must not depend on an SDK at run time
(the VM and Debian's packages have none), and clients only check `min` constraints, so the
server is the one that enforces max lengths, patterns and ranges. A unit test compares this
table with botocore's model so a drift is caught (tests/controlplane/test_apimodel.py).
"""

from __future__ import annotations

from typing import Any

TARGET_PREFIX = "BackupOnPremises_v20210101"
SIGNING_NAME = "backup-gateway"
API_VERSION = "2021-01-01"

_ARN_PATTERN = r"arn:(aws|aws-cn|aws-us-gov):backup-gateway(:[a-zA-Z-0-9]+){3}\/[a-zA-Z-0-9]+"

# Shape name -> constraints, named exactly as in the model (type, min, max, pattern, enum,
# required, members: member name -> shape name, member: list item shape).
SHAPES: dict[str, dict[str, Any]] = {
    "ActivationKey": {"type": "string", "min": 1, "max": 50, "pattern": r"[0-9a-zA-Z\-]+"},
    "Name": {"type": "string", "min": 1, "max": 100, "pattern": "[a-zA-Z0-9-]*"},
    "GatewayType": {"type": "string", "enum": ["BACKUP_VM"]},
    "GatewayArn": {"type": "string", "min": 50, "max": 180, "pattern": _ARN_PATTERN},
    "ResourceArn": {"type": "string", "min": 50, "max": 500, "pattern": _ARN_PATTERN},
    "TagKey": {
        "type": "string",
        "min": 1,
        "max": 128,
        "pattern": r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)",
    },
    "TagValue": {"type": "string", "min": 0, "max": 256, "pattern": r"[^\x00]*"},
    "Tag": {
        "type": "structure",
        "required": ["Key", "Value"],
        "members": {"Key": "TagKey", "Value": "TagValue"},
    },
    "Tags": {"type": "list", "member": "Tag"},
    "TagKeys": {"type": "list", "member": "TagKey"},
    "MaxResults": {"type": "integer", "min": 1},
    "NextToken": {"type": "string", "min": 1, "max": 1000, "pattern": ".+"},
    "HourOfDay": {"type": "integer", "min": 0, "max": 23},
    "MinuteOfHour": {"type": "integer", "min": 0, "max": 59},
    "DayOfWeek": {"type": "integer", "min": 0, "max": 6},
    "DayOfMonth": {"type": "integer", "min": 1, "max": 31},
    "AverageUploadRateLimit": {"type": "long", "min": 51200, "max": 8000000000000},
    "DaysOfWeek": {"type": "list", "min": 1, "max": 7, "member": "DayOfWeek"},
    "BandwidthRateLimitInterval": {
        "type": "structure",
        "required": [
            "StartHourOfDay",
            "EndHourOfDay",
            "StartMinuteOfHour",
            "EndMinuteOfHour",
            "DaysOfWeek",
        ],
        "members": {
            "AverageUploadRateLimitInBitsPerSec": "AverageUploadRateLimit",
            "StartHourOfDay": "HourOfDay",
            "EndHourOfDay": "HourOfDay",
            "StartMinuteOfHour": "MinuteOfHour",
            "EndMinuteOfHour": "MinuteOfHour",
            "DaysOfWeek": "DaysOfWeek",
        },
    },
    "BandwidthRateLimitIntervals": {
        "type": "list",
        "min": 0,
        "max": 20,
        "member": "BandwidthRateLimitInterval",
    },
    # Hypervisors and virtual machines. `sensitive` as in the model: never echo or log.
    "Host": {"type": "string", "min": 3, "max": 128, "pattern": ".+"},
    "Username": {
        "type": "string",
        "min": 1,
        "max": 100,
        "pattern": r"[ -\.0-\[\]-~]*[!-\.0-\[\]-~][ -\.0-\[\]-~]*",
        "sensitive": True,
    },
    "Password": {
        "type": "string", "min": 1, "max": 100, "pattern": "[ -~]+", "sensitive": True,
    },
    "KmsKeyArn": {
        "type": "string",
        "min": 50,
        "max": 500,
        "pattern": r"(^arn:(aws|aws-cn|aws-us-gov):kms:([a-zA-Z0-9-]+):([0-9]+):(key|alias)/(\S+)$)"
                   r"|(^alias/(\S+)$)",
    },
    "ServerArn": {"type": "string", "min": 50, "max": 500, "pattern": _ARN_PATTERN},
    "LogGroupArn": {
        "type": "string",
        "min": 0,
        "max": 2048,
        "pattern": r"$|^arn:(aws|aws-cn|aws-us-gov):logs:([a-zA-Z0-9-]+):([0-9]+):log-group:"
                   r"[a-zA-Z0-9_\-\/\.]+:\*",
    },
    "IamRoleArn": {
        "type": "string",
        "min": 20,
        "max": 2048,
        "pattern": r"arn:(aws|aws-cn|aws-us-gov):iam::([0-9]+):role/(\S+)",
    },
    "VmwareCategory": {"type": "string", "min": 1, "max": 80},
    "VmwareTagName": {"type": "string", "min": 1, "max": 80},
    "VmwareToAwsTagMapping": {
        "type": "structure",
        "required": ["VmwareCategory", "VmwareTagName", "AwsTagKey", "AwsTagValue"],
        "members": {
            "VmwareCategory": "VmwareCategory",
            "VmwareTagName": "VmwareTagName",
            "AwsTagKey": "TagKey",
            "AwsTagValue": "TagValue",
        },
    },
    "VmwareToAwsTagMappings": {"type": "list", "member": "VmwareToAwsTagMapping"},
    # Inputs.
    "CreateGatewayInput": {
        "type": "structure",
        "required": ["ActivationKey", "GatewayDisplayName", "GatewayType"],
        "members": {
            "ActivationKey": "ActivationKey",
            "GatewayDisplayName": "Name",
            "GatewayType": "GatewayType",
            "Tags": "Tags",
        },
    },
    "GetGatewayInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn"},
    },
    "ListGatewaysInput": {
        "type": "structure",
        "members": {"MaxResults": "MaxResults", "NextToken": "NextToken"},
    },
    "UpdateGatewayInformationInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn", "GatewayDisplayName": "Name"},
    },
    "DeleteGatewayInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn"},
    },
    "UpdateGatewaySoftwareNowInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn"},
    },
    "TagResourceInput": {
        "type": "structure",
        "required": ["ResourceARN", "Tags"],
        "members": {"ResourceARN": "ResourceArn", "Tags": "Tags"},
    },
    "UntagResourceInput": {
        "type": "structure",
        "required": ["ResourceARN", "TagKeys"],
        "members": {"ResourceARN": "ResourceArn", "TagKeys": "TagKeys"},
    },
    "ListTagsForResourceInput": {
        "type": "structure",
        "required": ["ResourceArn"],
        "members": {"ResourceArn": "ResourceArn"},
    },
    "PutBandwidthRateLimitScheduleInput": {
        "type": "structure",
        "required": ["GatewayArn", "BandwidthRateLimitIntervals"],
        "members": {
            "GatewayArn": "GatewayArn",
            "BandwidthRateLimitIntervals": "BandwidthRateLimitIntervals",
        },
    },
    "GetBandwidthRateLimitScheduleInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn"},
    },
    "PutMaintenanceStartTimeInput": {
        "type": "structure",
        "required": ["GatewayArn", "HourOfDay", "MinuteOfHour"],
        "members": {
            "GatewayArn": "GatewayArn",
            "HourOfDay": "HourOfDay",
            "MinuteOfHour": "MinuteOfHour",
            "DayOfWeek": "DayOfWeek",
            "DayOfMonth": "DayOfMonth",
        },
    },
    "ImportHypervisorConfigurationInput": {
        "type": "structure",
        "required": ["Name", "Host"],
        "members": {
            "Name": "Name",
            "Host": "Host",
            "Username": "Username",
            "Password": "Password",
            "KmsKeyArn": "KmsKeyArn",
            "Tags": "Tags",
        },
    },
    "GetHypervisorInput": {
        "type": "structure",
        "required": ["HypervisorArn"],
        "members": {"HypervisorArn": "ServerArn"},
    },
    "ListHypervisorsInput": {
        "type": "structure",
        "members": {"MaxResults": "MaxResults", "NextToken": "NextToken"},
    },
    "UpdateHypervisorInput": {
        "type": "structure",
        "required": ["HypervisorArn"],
        "members": {
            "HypervisorArn": "ServerArn",
            "Host": "Host",
            "Username": "Username",
            "Password": "Password",
            "Name": "Name",
            "LogGroupArn": "LogGroupArn",
        },
    },
    "DeleteHypervisorInput": {
        "type": "structure",
        "required": ["HypervisorArn"],
        "members": {"HypervisorArn": "ServerArn"},
    },
    "TestHypervisorConfigurationInput": {
        "type": "structure",
        "required": ["GatewayArn", "Host"],
        "members": {
            "GatewayArn": "GatewayArn",
            "Host": "Host",
            "Username": "Username",
            "Password": "Password",
        },
    },
    "AssociateGatewayToServerInput": {
        "type": "structure",
        "required": ["GatewayArn", "ServerArn"],
        "members": {"GatewayArn": "GatewayArn", "ServerArn": "ServerArn"},
    },
    "DisassociateGatewayFromServerInput": {
        "type": "structure",
        "required": ["GatewayArn"],
        "members": {"GatewayArn": "GatewayArn"},
    },
    "GetHypervisorPropertyMappingsInput": {
        "type": "structure",
        "required": ["HypervisorArn"],
        "members": {"HypervisorArn": "ServerArn"},
    },
    "PutHypervisorPropertyMappingsInput": {
        "type": "structure",
        "required": ["HypervisorArn", "VmwareToAwsTagMappings", "IamRoleArn"],
        "members": {
            "HypervisorArn": "ServerArn",
            "VmwareToAwsTagMappings": "VmwareToAwsTagMappings",
            "IamRoleArn": "IamRoleArn",
        },
    },
    "StartVirtualMachinesMetadataSyncInput": {
        "type": "structure",
        "required": ["HypervisorArn"],
        "members": {"HypervisorArn": "ServerArn"},
    },
    "ListVirtualMachinesInput": {
        "type": "structure",
        "members": {
            "HypervisorArn": "ServerArn",
            "MaxResults": "MaxResults",
            "NextToken": "NextToken",
        },
    },
    "GetVirtualMachineInput": {
        "type": "structure",
        "required": ["ResourceArn"],
        "members": {"ResourceArn": "ResourceArn"},
    },
}

_V, _C, _I, _A, _N, _T = (
    "ValidationException",
    "ConflictException",
    "InternalServerException",
    "AccessDeniedException",
    "ResourceNotFoundException",
    "ThrottlingException",
)

# Operation -> (input shape, the errors the model declares for it).
OPERATIONS: dict[str, tuple[str, list[str]]] = {
    "CreateGateway": (
        "CreateGatewayInput",
        ["ValidationException", "InternalServerException", "ThrottlingException"],
    ),
    "GetGateway": (
        "GetGatewayInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "ListGateways": (
        "ListGatewaysInput",
        ["ValidationException", "InternalServerException", "ThrottlingException"],
    ),
    "UpdateGatewayInformation": (
        "UpdateGatewayInformationInput",
        [
            "ValidationException",
            "ConflictException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "DeleteGateway": (
        "DeleteGatewayInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "UpdateGatewaySoftwareNow": (
        "UpdateGatewaySoftwareNowInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "TagResource": (
        "TagResourceInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "UntagResource": (
        "UntagResourceInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "ListTagsForResource": (
        "ListTagsForResourceInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "PutBandwidthRateLimitSchedule": (
        "PutBandwidthRateLimitScheduleInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "GetBandwidthRateLimitSchedule": (
        "GetBandwidthRateLimitScheduleInput",
        [
            "ValidationException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    "PutMaintenanceStartTime": (
        "PutMaintenanceStartTimeInput",
        [
            "ValidationException",
            "ConflictException",
            "InternalServerException",
            "ResourceNotFoundException",
            "ThrottlingException",
        ],
    ),
    # Hypervisors and virtual machines (errors in the model's order).
    "ImportHypervisorConfiguration": ("ImportHypervisorConfigurationInput", [_V, _C, _I, _A, _T]),
    "GetHypervisor": ("GetHypervisorInput", [_V, _I, _N, _T]),
    "ListHypervisors": ("ListHypervisorsInput", [_V, _I, _T]),
    "UpdateHypervisor": ("UpdateHypervisorInput", [_V, _C, _I, _A, _N, _T]),
    "DeleteHypervisor": ("DeleteHypervisorInput", [_V, _C, _I, _A, _N, _T]),
    "TestHypervisorConfiguration": ("TestHypervisorConfigurationInput", [_V, _C, _I, _N, _T]),
    "AssociateGatewayToServer": ("AssociateGatewayToServerInput", [_V, _C, _I, _T]),
    "DisassociateGatewayFromServer": ("DisassociateGatewayFromServerInput", [_V, _C, _I, _N, _T]),
    "GetHypervisorPropertyMappings": ("GetHypervisorPropertyMappingsInput", [_V, _I, _N, _T]),
    "PutHypervisorPropertyMappings": (
        "PutHypervisorPropertyMappingsInput", [_V, _C, _I, _A, _N, _T],
    ),
    "StartVirtualMachinesMetadataSync": (
        "StartVirtualMachinesMetadataSyncInput", [_V, _I, _A, _N, _T],
    ),
    "ListVirtualMachines": ("ListVirtualMachinesInput", [_V, _I, _T]),
    "GetVirtualMachine": ("GetVirtualMachineInput", [_V, _I, _N, _T]),
}

# Error name -> HTTP status, from the model's `error.httpStatusCode`.
ERROR_STATUS: dict[str, int] = {
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ConflictException": 409,
    "ThrottlingException": 429,
    "InternalServerException": 500,
}
